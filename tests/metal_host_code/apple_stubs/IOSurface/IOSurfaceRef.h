// Stub of an Apple system header (see ../README.md): just the declarations
// metal-cpp and MLX's Metal headers name, with the types Apple gives them.
#pragma once
typedef struct __IOSurface* IOSurfaceRef;
