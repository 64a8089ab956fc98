// Stub of an Apple system header (see ../README.md): just the declarations
// metal-cpp and MLX's Metal headers name, with the types Apple gives them.
#pragma once
#include <cstdint>
typedef double CFTimeInterval;
typedef const void* CFTypeRef;
typedef const struct __CFString* CFStringRef;
typedef signed long CFIndex;
typedef unsigned long CFOptionFlags;
typedef unsigned long CFHashCode;
typedef struct { CFIndex location; CFIndex length; } CFRange;
