"""Plain PyTorch twins of every public kernel op, same signatures: the parity oracle and the CPU backend.

Only torch is imported here, never triton or transformers.
"""
import math

import torch
import torch.nn.functional as F

# ==== ATTENTION (flash_attention_ref) ====
# ==== END ATTENTION ====

# ==== POOLING (masked_pool_ref) ====
# ==== END POOLING ====

# ==== CROSS ENTROPY (fused_linear_cross_entropy_ref) ====
# ==== END CROSS ENTROPY ====
