// Empty stand-in for the CUDA header of this name: emu.h (force-included) defines
// what the kernels use from it.
#pragma once
