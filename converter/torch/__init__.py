"""The torch side: the only place torch is imported."""
