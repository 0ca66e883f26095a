"""Built-in methods, one module each; importing a module registers it. stepdistill.registry imports every module
here when a method is first looked up, so importing this package (or methods.config) alone loads no model code."""
