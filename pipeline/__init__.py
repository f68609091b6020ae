"""Image-classification pipeline: DVC stages fetch_data -> prepare -> train -> evaluate."""
