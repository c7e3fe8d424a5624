"""Run grpo.py under a launcher and count the bytes ZeRO-3 all-gathers on this rank (tests/test_gpu_paths.py).

    torchrun --nproc_per_node 2 tests/probe_allgather.py COUNT_FILE <grpo.py arguments>

DeepSpeed gathers partitioned parameters through its torch backend's all_gather_into_tensor (or
all_gather when that is missing); both are wrapped here to add up the bytes they return. Every rank
appends its total to COUNT_FILE.rank{R} at exit."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepspeed.comm.torch import TorchBackend  # noqa: E402

total = [0]


def counting(fn, out_bytes):
    def wrapped(self, *args, **kwargs):
        total[0] += out_bytes(*args, **kwargs)
        return fn(self, *args, **kwargs)
    return wrapped


def _into(output_tensor=None, input_tensor=None, *a, **k):
    return output_tensor.numel() * output_tensor.element_size()


def _list(tensor_list=None, tensor=None, *a, **k):
    return sum(t.numel() * t.element_size() for t in tensor_list)


TorchBackend.all_gather_into_tensor = counting(TorchBackend.all_gather_into_tensor, _into)
TorchBackend.all_gather = counting(TorchBackend.all_gather, _list)

if __name__ == "__main__":
    import grpo
    count_file, argv = sys.argv[1], sys.argv[2:]
    try:
        grpo.main(argv)
    finally:
        with open(f"{count_file}.rank{os.environ.get('RANK', '0')}", "w") as f:
            f.write(str(total[0]))
