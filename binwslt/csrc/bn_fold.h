// The BatchNorm fold of the fused layers' backward, defined once for the CPU extensions (lif_scan.cpp's
// epilogue_fold, amx_conv.cpp's staging of g): dL/d(alpha*y) = (g*c1 + c3) + y*c2 per output channel
// (binwslt/batchnorm.py's coefficients). Built with -ffp-contract=off, so both round alike, operation by operation.
#pragma once

template <typename scalar_t>
inline scalar_t bn_fold(scalar_t g, scalar_t y, scalar_t c1, scalar_t c2, scalar_t c3) {
  return (g * c1 + c3) + y * c2;
}
