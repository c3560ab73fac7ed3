"""CodeIndex (tensor prefix tree) against the plain DictTrie reference."""
import itertools

import pytest
import torch

from avg.search.code_index import CodeIndex, DictTrie, InvalidPrefixError


def _gallery(seed, num_codes, code_len, alphabet, offset=10, per_position=False, dup=0):
    """Random token codes; a small ``alphabet`` makes many codes share prefixes.

    ``per_position`` gives every position its own token range (a vocabulary layout the index must
    support); ``dup`` appends that many repeated rows."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, alphabet, (num_codes, code_len), generator=g) + offset
    if per_position:
        codes = codes + torch.arange(code_len) * alphabet
    if dup:
        codes = torch.cat([codes, codes[torch.randint(0, num_codes, (dup,), generator=g)]])
    return codes


CASES = [
    dict(seed=0, num_codes=1, code_len=4, alphabet=50),  # a gallery of one code
    dict(seed=1, num_codes=40, code_len=3, alphabet=3),  # heavy prefix sharing
    dict(seed=2, num_codes=200, code_len=4, alphabet=6, dup=50),  # duplicates in the input
    dict(seed=3, num_codes=300, code_len=5, alphabet=40, per_position=True),
    dict(seed=4, num_codes=64, code_len=2, alphabet=8, dup=64),
]


@pytest.mark.parametrize("case", CASES)
def test_allowed_tokens_match_dict_trie(case):
    codes = _gallery(**case)
    vocab = int(codes.max()) + 5
    index = CodeIndex.from_codes(codes, vocab)
    trie = DictTrie(codes.tolist())
    unique = sorted(set(map(tuple, codes.tolist())))
    assert index.num_codes == len(unique)
    assert index.code_len == codes.shape[1]
    assert index.codes().tolist() == [list(c) for c in unique]
    for depth in range(codes.shape[1]):
        prefixes = sorted({c[:depth] for c in unique})
        tok, count = index.allowed_tokens(torch.tensor(prefixes, dtype=torch.long).reshape(len(prefixes), depth))
        assert bool((count >= 1).all()), "a valid prefix must never get an empty allowed set"
        for row, prefix in enumerate(prefixes):
            got = tok[row, : int(count[row])].tolist()
            assert got == sorted(trie.allowed(prefix))
            assert bool((tok[row, int(count[row]):] == -1).all())
        # the full-vocabulary mask says the same, for all rows at once
        nodes = index.lookup(torch.tensor(prefixes, dtype=torch.long).reshape(len(prefixes), depth))
        mask = index.allowed_mask(nodes, depth)
        for row, prefix in enumerate(prefixes):
            assert mask[row].nonzero().squeeze(1).tolist() == sorted(trie.allowed(prefix))


def test_find_child_misses_and_dead_rows():
    codes = _gallery(seed=5, num_codes=100, code_len=3, alphabet=5)
    vocab = int(codes.max()) + 3
    index = CodeIndex.from_codes(codes, vocab)
    trie = DictTrie(codes.tolist())
    for first, second in itertools.product(range(vocab), range(8, 18)):
        try:
            trie.allowed([first])
        except InvalidPrefixError:
            assert int(index.find_child(torch.tensor([0]), 0, torch.tensor([first]))) == -1
            continue
        node = index.lookup(torch.tensor([[first]]))
        child = int(index.find_child(node, 1, torch.tensor([second])))
        assert (child >= 0) == (second in trie.allowed([first]))
    mask = index.allowed_mask(torch.zeros(3, dtype=torch.long), 0, active=torch.tensor([True, False, True]))
    assert mask[1].sum() == 0 and mask[0].sum() == len(trie.allowed([]))


def test_invalid_prefix_raises():
    codes = torch.tensor([[10, 11, 12], [10, 13, 14]])
    index = CodeIndex.from_codes(codes, 20)
    trie = DictTrie(codes.tolist())
    with pytest.raises(InvalidPrefixError):
        index.allowed_tokens(torch.tensor([[10, 12]]))
    with pytest.raises(InvalidPrefixError):
        index.lookup(torch.tensor([[11]]))
    with pytest.raises(InvalidPrefixError):
        trie.allowed([10, 12])
    fn = index.prefix_allowed_tokens_fn(prompt_len=1, eos_token_id=1)
    assert fn(0, torch.tensor([0, 10])) == [11, 13]
    assert fn(0, torch.tensor([0, 10, 13, 14])) == [1]
    with pytest.raises(InvalidPrefixError):
        fn(0, torch.tensor([0, 10, 11, 14]))


def test_bad_codes_rejected():
    with pytest.raises(ValueError):
        CodeIndex.from_codes(torch.tensor([10, 11]), 20)  # not 2-D
    with pytest.raises(ValueError, match="row 1"):
        CodeIndex.from_codes(torch.tensor([[1, 2], [3, 25]]), 20)
    with pytest.raises(ValueError):
        CodeIndex.from_codes(torch.zeros(0, 3, dtype=torch.long), 20)
    with pytest.raises(ValueError):
        DictTrie([[1, 2], [1, 2, 3]])


def test_memory_is_linear_in_codes():
    # 50K random codes of length 4 over 1024 vokens: ints stored as int32, at most ~2 per prefix.
    codes = torch.randint(0, 1024, (50_000, 4), generator=torch.Generator().manual_seed(0)) + 32_000
    index = CodeIndex.from_codes(codes, 33_024)
    n_nodes = sum(index.num_nodes(d) for d in range(1, 5))
    assert index.nbytes == 4 * (n_nodes + sum(index.num_nodes(d) + 1 for d in range(4)))
    assert index.nbytes < 8 * codes.numel()  # 1M codes -> < 32 MB, far under the 100 MB target
    moved = index.to("cpu")
    assert moved.nbytes == index.nbytes and moved.num_codes == index.num_codes
