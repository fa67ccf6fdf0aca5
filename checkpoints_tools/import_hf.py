"""Import a Hugging Face NemotronH directory as a checkpoint (toolkit/checkpoint/hf_import.py):

python checkpoints_tools/import_hf.py --in nemotron-h-dir --out runs/nh/checkpoints
"""

from toolkit.checkpoint.hf_import import main

if __name__ == "__main__":
    raise SystemExit(main())
