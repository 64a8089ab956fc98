// Ends the Metal part of a harness translation unit (build.py includes it after the
// .metal sources): removes the shim's keyword and constructor macros so that the
// adaptor, and any host header it includes (a launch plan with a field named
// `kernel`, <thread>, ...), is ordinary C++. Metal types stay usable as metal::half.
#pragma once
#undef device
#undef threadgroup
#undef constant
#undef thread
#undef kernel
#undef MH_TG_LOCAL
#undef float2
#undef float3
#undef float4
#undef half2
#undef half3
#undef half4
#undef bfloat2
#undef bfloat3
#undef bfloat4
#undef int2
#undef int3
#undef int4
#undef uint2
#undef uint3
#undef uint4
#undef long2
#undef ulong2
