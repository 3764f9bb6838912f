"""Mesh construction, logical axis rules, shardings, global arrays and AOT compilation."""
