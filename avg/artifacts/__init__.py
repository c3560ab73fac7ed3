"""The files stages hand each other: CLIP features (prepare_emb/), voken codes (generate_codes/), run files."""
