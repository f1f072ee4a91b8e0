/* Prints a greeting, signals the boot timer, exits with status 42. */
#include "common.S"
    .globl _start
_start:
    mov $0x80000, %esp
    PRINT(msg)
    mov $BOOT_TIMER, %dx
    mov $123, %al
    out %al, (%dx)
    mov $42, %al
    jmp exit_with
    .section .rodata
msg: .asciz "hello from the payload\n"
