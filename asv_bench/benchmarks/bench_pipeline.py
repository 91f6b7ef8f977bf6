"""numlora inside a program: one pass of the transformer-block-shaped numpy + numlora
model of ``numlora bench --pipeline`` (numlora.bench.pipeline), forward (QLoraLinear,
LoraLinear and LoraBank layers between numpy products, norms and softmax) and a training
step (forward + backward + AdamW), back to back. d_model = N / 4 (1024 at the default
N = 4096), d_ff = N, rank 16, 4 bank adapters."""

from numlora.bench.pipeline import Block, Sizes

from ._shared import N


def _sizes():
    d = max(N // 4, 16)
    return Sizes(d_model=d, d_ff=4 * d, heads=8 if d % 8 == 0 and d >= 64 else 1)


class PipelineForward:
    params = [1, 8, 128]
    param_names = ["batch"]

    def setup(self, batch):
        self.block = Block(_sizes(), batch)
        self.block.train(False)
        self.block.step()

    def time_forward(self, batch):
        self.block.step()


class PipelineTrainStep:
    params = [1, 8, 128]
    param_names = ["batch"]

    def setup(self, batch):
        self.block = Block(_sizes(), batch)
        self.block.train(True)
        self.block.step()

    def time_train_step(self, batch):
        self.block.step()
