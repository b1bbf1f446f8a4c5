// Stand-in for CUDA's <cuda_fp16.h>: the CPU emulator (../emu.h).
#pragma once
#include "../emu.h"
