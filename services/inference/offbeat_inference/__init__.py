"""offbeat inference service: Samples the policy: engines, continuous batching, in-flight weight updates."""
