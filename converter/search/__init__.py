"""auto: the search for the fastest model within an accuracy budget."""
