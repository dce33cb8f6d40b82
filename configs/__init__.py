"""The example configs that reproduce every documented run, shipped inside the wheel as
``retromem.configs`` (find one with :func:`retromem.assets.config_file`)."""
