/* Resets the machine through the i8042 (what Linux does with reboot=k). */
#include "common.S"
    .globl _start
_start:
    mov $0x80000, %esp
    PRINT(msg)
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b
    .section .rodata
msg: .asciz "resetting\n"
