"""The README's quick start, as a script (tests/test_quickstart.py runs it)."""
import torch, torchvision
import nnsim_hooks

model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
images = torch.randn(8, 3, 32, 32)

with nnsim_hooks.attach(model) as h:              # hooks in; the model is not modified
    grads = h.per_sample_gradients(images)        # {"conv1.weight": [8, 64, 3, 7, 7], ...}
    sims = h.similarity(images)                   # [8, 8] exact cosine kernel
    feats = h.features(images)                    # [8, 1024] sketched: feats @ feats.T ~ sims
    print(h.coverage)                             # which rule handles which module
