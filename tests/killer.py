"""A callback that SIGKILLs its own training process, for tests of resuming (no cleanup can run)."""
import os
import signal

import lightning as L


class KillAt(L.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
