"""Models: the NoPE GPT encoder, PLR and DCNv2 tabular layers, joint fusion; Auto-class registration."""
