"""The model families: one module each, registering one FamilyModel subclass with models.registry.

models.registry imports every module here on first use, so adding a family is adding a file (plus its tests);
nothing else in the package lists family names. Modules whose names start with "_" are helpers, not imported.
"""
