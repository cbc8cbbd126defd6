"""One process is a rank of one: shares, owners and collectives that do nothing."""
import torch

from dsq.core.ranks import SINGLE, Ranks, current_ranks


def test_shares_cover_every_item_once_in_order():
    for world in (1, 2, 3, 5):
        for count in (world, 7, 16):
            shares = [Ranks(r, world).share(count) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(count))
            assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1


def test_owners_deal_round_robin():
    assert [Ranks(0, 3).owner(i) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_without_a_process_group_collectives_leave_tensors_alone():
    assert current_ranks() == SINGLE and SINGLE.main and not SINGLE.several
    t = torch.tensor([1.0, 2.0])
    assert SINGLE.sum_(t) is t and SINGLE.max_(t) is t and SINGLE.broadcast_(t, 0) is t
    assert torch.equal(t, torch.tensor([1.0, 2.0]))
