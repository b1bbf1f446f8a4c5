// Stand-in for CUDA's <cuda_runtime_api.h>: the CPU emulator (../emu.h).
#pragma once
#include "../emu.h"
