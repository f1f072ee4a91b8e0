/* Loads an empty IDT and raises an exception: the CPU triple-faults. */
#include "common.S"
    .globl _start
_start:
    mov $0x80000, %esp
    PRINT(msg)
    lidt empty_idt
    xor %ecx, %ecx
    div %ecx
1:  jmp 1b
    .section .rodata
msg: .asciz "faulting\n"
empty_idt: .word 0
    .long 0
