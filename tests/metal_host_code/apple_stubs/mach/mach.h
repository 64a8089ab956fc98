// Stub of an Apple system header (see ../README.md): just the declarations
// metal-cpp and MLX's Metal headers name, with the types Apple gives them.
#pragma once
typedef int kern_return_t;
typedef unsigned int mach_port_t;
typedef mach_port_t task_id_token_t;
