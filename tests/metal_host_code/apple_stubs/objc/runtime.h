// Stub of an Apple system header (see ../README.md): just the declarations
// metal-cpp and MLX's Metal headers name, with the types Apple gives them.
#pragma once
typedef struct objc_class* Class;
struct objc_object { Class isa; };
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef struct objc_object Protocol;
typedef bool BOOL;
typedef id (*IMP)(id, SEL, ...);
#define YES true
#define NO false
#define nil nullptr
extern "C" {
SEL sel_registerName(const char*);
Class objc_lookUpClass(const char*);
Protocol* objc_getProtocol(const char*);
}
