"""Recipes: schema, pipeline, the run report and auto's report."""
