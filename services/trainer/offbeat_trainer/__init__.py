"""offbeat trainer service: Turns scored trajectories into new policy versions."""
