/* Halts with interrupts off forever: only the host can end this VM. */
#include "common.S"
    .globl _start
_start:
    mov $0x80000, %esp
    PRINT(msg)
1:  cli
    hlt
    jmp 1b
    .section .rodata
msg: .asciz "halting\n"
