"""What a stage does: one module per stage, each with a ``run(...)`` entry."""
