"""A build_index run in a child process, for the fault-injection tests (tests/test_faults_store.py).

    python fault_child.py INPUTS.pt FOLDER [--kill-after-writes N] [--delay SECONDS]

Builds an index of the tiny MLP saved in INPUTS.pt into FOLDER. ``--kill-after-writes N``
SIGKILLs the process in the middle of its N-th ``os.write`` (half of the bytes written:
a torn write), so that a kill can be placed anywhere: the first manifest write, a column
append before the first commit, a commit, the final commit. ``--delay`` slows every
sample down, so that another process can act while this one writes. Prints "writes: N"
(the number of os.write calls) when it finishes uninterrupted.
"""

import argparse
import os
import signal
import sys
import time

import torch
from torch.utils.data import Dataset

import nnsim_hooks


def make_model(state):
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).eval()
    model.load_state_dict(state)
    return model


class Samples(Dataset):
    def __init__(self, x, y, delay=0.0):
        self.x, self.y, self.delay = x, y, delay

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.x[i], self.y[i]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("inputs")
    parser.add_argument("folder")
    parser.add_argument("--kill-after-writes", type=int, default=None)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    d = torch.load(args.inputs)
    real_write, calls = os.write, [0]

    def write(fd, data):
        calls[0] += 1
        if calls[0] == args.kill_after_writes:
            view = memoryview(data).cast("B")
            real_write(fd, view[: len(view) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(fd, data)

    os.write = write
    h = nnsim_hooks.attach(make_model(d["state"]), sketch_dim=d["dim"])
    print("started", flush=True)
    h.build_index(Samples(d["x"], d["y"], args.delay), args.folder, batch_size=d["batch_size"], progress=False,
                  index=d.get("index", "flat"))
    print(f"writes: {calls[0]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
