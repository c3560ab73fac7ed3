"""The files stages hand each other: CLIP features (emb/), voken codes (codes/), run files."""
