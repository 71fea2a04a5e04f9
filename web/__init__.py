"""The web server inside `smame run`: the JSON API v1 for customers' machines, on the store the services keep."""
