"""blip2kit.plugins: the built-in components, each family registered through the `blip2kit`
entry-point group exactly as a third-party package would register its own."""
