"""One module per CLI verb: ``register(subparsers, common)`` adds the parser and sets
``run``; heavy imports happen inside ``run`` so ``--help`` stays fast and torch-free."""
