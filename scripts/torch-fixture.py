"""Writes kernels/tests/data/torch-net.onnx and torch-net-reference.json: a small network
exported by torch.onnx.export (opset 17, evaluation mode, as users export), and PyTorch's own
loss and gradients for one fixed batch in training mode (BatchNormalization on batch
statistics), plus the running statistics after that step. kernels/tests/torch_export.rs
checks amicus's derived training graph against them.

Needs PyTorch (not a dependency of the project; only to regenerate the fixture):
    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch onnx
    /tmp/torch/bin/python scripts/torch-fixture.py
"""
import json
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)


class Net(nn.Module):
    """Conv + BatchNorm + ReLU, max-pool, grouped conv, bilinear and nearest upsampling,
    a skip connection by concatenation, LeakyReLU, a crop (Slice), a 1x1 head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(12, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        a = F.relu(self.bn(self.c1(x)))
        b = F.relu(self.c2(F.max_pool2d(a, 2)))
        up = F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False)
        up = up + F.interpolate(b, scale_factor=2, mode="nearest")
        c = F.leaky_relu(self.c3(torch.cat([up, a], 1)), 0.1)
        return self.head(c[:, :, 1:-1, 1:-1])


net = Net()
# Non-trivial BatchNorm parameters and statistics (fresh ones are ones and zeros).
with torch.no_grad():
    net.bn.weight.uniform_(0.5, 1.5)
    net.bn.bias.uniform_(-0.5, 0.5)
    net.bn.running_mean.uniform_(-0.1, 0.1)
    net.bn.running_var.uniform_(0.9, 1.1)
out_dir = pathlib.Path(__file__).resolve().parent.parent / "kernels/tests/data"
x = torch.randn(2, 1, 16, 16)
net.eval()
torch.onnx.export(
    net, x, str(out_dir / "torch-net.onnx"), opset_version=17,
    input_names=["image"], output_names=["logits"],
    dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, dynamo=False,
    # Keep BatchNormalization a node: the default folds it into the convolution before it
    # (which then trains as a plain convolution, also fine, but not what this checks).
    do_constant_folding=False,
)
net.train()
target = torch.randn(2, 1, 14, 14)
loss = F.mse_loss(net(x), target)
loss.backward()
reference = {
    "torch": torch.__version__,
    "image": x.flatten().tolist(),
    "labels": target.flatten().tolist(),
    "loss": loss.item(),
    "grads": {n: p.grad.flatten().tolist() for n, p in net.named_parameters()},
    "running": {
        "bn.running_mean": net.bn.running_mean.flatten().tolist(),
        "bn.running_var": net.bn.running_var.flatten().tolist(),
    },
}
(out_dir / "torch-net-reference.json").write_text(json.dumps(reference))
print("wrote", out_dir / "torch-net.onnx", "and torch-net-reference.json")
