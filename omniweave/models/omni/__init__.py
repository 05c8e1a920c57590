"""OmniModel: encoders -> foundation LLM -> decoders."""
