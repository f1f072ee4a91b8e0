/* An ELF kernel without a PVH note: entered through the 64-bit Linux boot protocol. */
    .text
    .globl _start
_start:
#include "long64_body.S"
