// Stub of an Apple system header (see ../README.md): just the declarations
// metal-cpp and MLX's Metal headers name, with the types Apple gives them.
#pragma once
#include <objc/runtime.h>
extern "C" {
void objc_msgSend(void);
void objc_msgSendSuper(void);
void objc_msgSend_stret(void);
void objc_msgSend_fpret(void);
}
