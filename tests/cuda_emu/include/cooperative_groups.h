// Stand-in for CUDA's <cooperative_groups.h>: the CPU emulator (../emu.h).
#pragma once
#include "../emu.h"
