"""Model recipes, building and weight loading."""
