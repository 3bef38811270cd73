"""Command-line tools: data preprocessing, dataset merge and verification, checkpoint conversion."""
