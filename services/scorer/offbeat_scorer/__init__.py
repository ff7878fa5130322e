"""offbeat scorer service: Scores completions with the environments' rubrics."""
