"""The toy world: captioned 32x32 shapes, its judge, its teachers and their evaluation (docs/toy_world.md)."""
