"""dataset_conversion stage."""
