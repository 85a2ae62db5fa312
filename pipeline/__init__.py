"""What users run: video QA jobs, batch captioning, camera feeds, the CLI and config."""
