"""Run kohya's train_network.py on a diffusers UNet of any shape (bench/peers.py, the toy model).

kohya's script rebuilds a diffusers UNet as its own SD 1.x UNet (library/original_unet.py), whose
channel widths and block layout are SD 1.5's, fixed in code: the toy model's 32/64/128 channels do not
load into it. This runner swaps just that one loader function for one that keeps the diffusers UNet
(the same UNet sdlora and the diffusers example train) and then runs train_network.py as `python
train_network.py ARGS` would, unchanged otherwise: its data pipeline, latent cache, text encoding, LoRA
network, optimizer and loop. kohya's LoRA finds the attention blocks by class name
(Transformer2DModel), which diffusers' UNet has too. Not used for the real SD 1.5 architecture, which
kohya loads itself.

    KOHYA=PEERS/sd-scripts python bench/peer_kohya.py --pretrained_model_name_or_path models/toy-sd1 ...
"""

from __future__ import annotations

import os
import runpy
import sys


def keep_diffusers_unet(args, weight_dtype, device="cpu", unet_use_linear_projection_in_v2=False):
    """kohya's _load_target_model for a diffusers folder, without the conversion to its own UNet."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, tokenizer=None,
                                                   safety_checker=None)
    unet = pipe.unet
    # train_util.replace_unet_modules asks kohya's UNet for its attention kernel; diffusers' UNet
    # already uses torch's scaled_dot_product_attention, which is what --sdpa selects there.
    unet.set_use_sdpa = lambda enabled: None
    unet.set_use_memory_efficient_attention = lambda xformers, mem_eff: None
    return pipe.text_encoder, pipe.vae, unet, False


def main() -> None:
    kohya = os.environ["KOHYA"]
    sys.path.insert(0, kohya)
    from library import train_util

    train_util._load_target_model = keep_diffusers_unet
    script = os.path.join(kohya, "train_network.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
