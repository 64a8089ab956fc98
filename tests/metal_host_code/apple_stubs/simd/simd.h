// Stub of an Apple system header (see ../README.md): metal-cpp includes it, but
// nothing that eval_gpu uses needs a declaration from it.
#pragma once
