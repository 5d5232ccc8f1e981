#!/usr/bin/env bash
# A virtual environment for each peer of bench/peers.py, from its own source and requirements.
#
#   bash bench/peers_setup.sh PEERS
#
# PEERS is a folder holding clones you made yourself (nothing of theirs is in this repository):
#   PEERS/sd-scripts   git clone https://github.com/kohya-ss/sd-scripts
#   PEERS/diffusers    git clone https://github.com/huggingface/diffusers
# and gets PEERS/kohya-venv and PEERS/diffusers-venv. Each takes torch as the machine has it (set
# TORCH to pin it: "torch==2.13.0" for a CPU machine whose CPU wheel is on disk, the default) and then
# the peer's own requirements: sd-scripts' requirements.txt with its pins (and torchvision, which it
# imports but does not list), the diffusers example's examples/text_to_image/requirements.txt on the
# registry's diffusers release (the example's check_min_version must accept it). Run it again to
# rebuild one: a venv that exists is kept unless you delete it.
set -euo pipefail

peers=${1:?usage: bash bench/peers_setup.sh PEERS (a folder with your clones sd-scripts/ and diffusers/)}
peers=$(cd "$peers" && pwd)
torch_pin=${TORCH:-torch==2.13.0}
vision_pin=${TORCHVISION:-torchvision==0.28.0}  # the release built against torch 2.13
for source in sd-scripts diffusers; do
    if [ ! -d "$peers/$source" ]; then
        echo "bench/peers_setup.sh: $peers/$source is missing: clone it there first (see the top of this script)" >&2
        exit 2
    fi
done

make_venv() {  # make_venv NAME: a fresh venv with torch, unless it exists
    local venv="$peers/$1"
    if [ -x "$venv/bin/python" ]; then
        echo "$venv exists: kept"
        return 1
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q "$torch_pin" "$vision_pin"
}

mend_torchvision() {  # mend_torchvision VENV
    # The registry's torchvision is built against CUDA torch; next to a CPU torch its compiled operators
    # (nms, roi_align: detection ops neither peer uses) cannot load, and its import then fails on the
    # two it registers without checking, as it checks the others. Make those two checked too; the
    # image transforms the peers use are pure Python and unchanged.
    local venv="$peers/$1"
    if "$venv/bin/python" -c "import torchvision" 2>/dev/null; then return; fi
    local meta
    meta=$("$venv/bin/python" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py
    sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::q?nms")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))/' "$meta"
    "$venv/bin/python" -c "import torchvision" || { echo "bench/peers_setup.sh: torchvision does not import in $venv" >&2; exit 1; }
    echo "$venv: torchvision's compiled operators do not load next to this torch; its import mended ($meta)"
}

if make_venv kohya-venv; then
    # requirements.txt ends with "-e ." (its library package), so it installs from its own folder.
    (cd "$peers/sd-scripts" && "$peers/kohya-venv/bin/pip" install -q -r requirements.txt)
fi

if make_venv diffusers-venv; then
    "$peers/diffusers-venv/bin/pip" install -q diffusers \
        -r "$peers/diffusers/examples/text_to_image/requirements.txt"
fi

mend_torchvision kohya-venv
mend_torchvision diffusers-venv
echo "peers ready in $peers: python bench/peers.py --peers $peers"
