"""dce: removes unused pure computations and the weights only they used."""
from __future__ import annotations

import torch
import torch.nn as nn

from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.pass_manager import PassManager
from gradrewrite.rewrite.pipeline import build_passes, parse_pipeline


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 8)

    def forward(self, x):
        _ = torch.sigmoid(self.unused(x) * 3)   # computed, never used
        return self.used(x).relu()


def test_dce_structure_and_numerics():
    m = Dead().eval()
    x = torch.randn(2, 4)
    g = capture(m, (x,))
    # torch.export already drops some dead code; re-add a dead branch to be sure
    out = next(n for n in g.nodes if n.op == "output")
    with g.graph.inserting_before(out):
        dead = g.graph.call_function(torch.ops.aten.mul.Tensor, (out.args[0][0], 2.0))
        g.graph.call_function(torch.ops.aten.exp.default, (dead,))
    g.commit()
    before = g.node_count()
    rec = PassManager(build_passes(parse_pipeline("dce"))).run(g).records[0]
    assert rec.report["removed_nodes"] == before - g.node_count() >= 2
    assert "aten.exp" in rec.report["removed_by_op"]
    assert not any(name.startswith("unused") for name, _ in g.gm.named_parameters())
    torch.testing.assert_close(g(x)[0], m(x), rtol=0, atol=0)
