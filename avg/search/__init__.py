"""Search over voken codes and features, and the command line over a trained run.

* ``code_index`` -- a gallery's codes as per-depth CSR prefix tables (which vokens may follow a prefix);
* ``beam`` -- constrained beam search over that index (Sec. 3.3);
* ``gallery`` -- a split's images with their codes: the index to search, and ranking found codes into images;
* ``exact`` -- exact inner-product search over feature matrices (the CLIP two-tower baseline);
(The command line over a trained run, ``avg search``, is avg.cli, at the top of the layers.)
"""
