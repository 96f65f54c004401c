"""Our hand-written losses must agree with PyTorch's, in values and gradients."""
import torch.nn.functional as F

from losscmp.testing import assert_losses_agree
from losses import bce_with_logits, smooth_l1


def test_bce_matches_torch(losscmp):
    # The fixture: replays the cases saved by earlier failures first, then fuzzes;
    # a divergence is minimised and saved under .losscmp/.
    losscmp.check(bce_with_logits, F.binary_cross_entropy_with_logits, spec="binary")


def test_smooth_l1_matches_torch():
    # The plain assertion, usable in any test (like torch.testing.assert_close).
    assert_losses_agree(smooth_l1, F.smooth_l1_loss, spec="regression")
